variable "name" {
  description = "Prefix of the roles' names."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider."
  type        = string
}

variable "oidc_issuer" {
  description = "Issuer of the cluster's OIDC provider, without https://."
  type        = string
}

variable "bucket_arn" {
  description = "ARN of the checkpoint and artifact bucket."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key the bucket's objects are encrypted with."
  type        = string
}

variable "ray_service_account" {
  description = "Namespace and name of the Ray pods' service account."
  type        = object({ namespace = string, name = string })
}

variable "mlflow_service_account" {
  description = "Namespace and name of the MLflow server's service account."
  type        = object({ namespace = string, name = string })
}
