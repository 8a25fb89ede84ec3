variable "namespace" {
  description = "Namespace of the MLflow server."
  type        = string
  default     = "mlflow"
}

variable "service_account" {
  description = "Service account of the MLflow server."
  type        = string
  default     = "mlflow"
}

variable "role_annotations" {
  description = "Annotations that bind the service account to a cloud identity (on AWS: eks.amazonaws.com/role-arn)."
  type        = map(string)
}

variable "image" {
  description = "Image with mlflow, boto3 and psycopg2 (the amalgam image)."
  type        = string
}

variable "backend_store_uri" {
  description = "SQLAlchemy URI of the backend store, password included (kept in a Kubernetes secret)."
  type        = string
  sensitive   = true
}

variable "artifacts_destination" {
  description = "Where the server stores artifacts it proxies, e.g. s3://bucket/mlflow-artifacts."
  type        = string
}

variable "replicas" {
  description = "Number of MLflow server pods. One by default: each server creates or migrates the database schema when it starts, and two doing that at once on a new database can collide."
  type        = number
  default     = 1
}
