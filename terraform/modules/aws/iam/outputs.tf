output "ray_role_arn" {
  description = "IAM role of the Ray and Prefect job pods (annotate their service account with it)."
  value       = aws_iam_role.this["ray"].arn
}

output "mlflow_role_arn" {
  description = "IAM role of the MLflow server's service account."
  value       = aws_iam_role.this["mlflow"].arn
}
