variable "cluster_name" {
  description = "Name of the EKS cluster whose node groups it scales."
  type        = string
}

variable "region" {
  description = "AWS region of the cluster."
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

variable "chart_version" {
  description = "Version of the cluster-autoscaler Helm chart (its app version should match the cluster's Kubernetes minor version)."
  type        = string
}
