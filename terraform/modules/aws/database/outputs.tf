output "secret_arn" {
  description = "ARN of the Secrets Manager secret with the credentials and URI (never the password itself)."
  value       = aws_secretsmanager_secret.mlflow_db.arn
}

output "backend_store_uri" {
  description = "SQLAlchemy URI of the database, password included: for the MLflow server's Kubernetes secret only."
  value       = local.uri
  sensitive   = true
}

output "endpoint" {
  description = "Host name of the database."
  value       = aws_db_instance.mlflow.address
}
