variable "chart_version" {
  description = "Version of the kuberay-operator Helm chart."
  type        = string
}

variable "namespace" {
  description = "Namespace of the RayCluster and of Prefect's job pods."
  type        = string
}

variable "service_account" {
  description = "Service account of Ray pods and Prefect job pods."
  type        = string
}

variable "role_annotations" {
  description = "Annotations that bind the service account to a cloud identity (on AWS: eks.amazonaws.com/role-arn)."
  type        = map(string)
}
