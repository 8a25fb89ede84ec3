output "tracking_uri" {
  description = "In-cluster URL of the MLflow tracking server."
  value       = "http://${local.host}:5000"
}
