variable "cluster_name" {
  description = "Name of the EKS cluster whose node groups it scales."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes version of the cluster (major.minor): the autoscaler image is v<it>.0."
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
