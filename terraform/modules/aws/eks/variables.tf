variable "name" {
  description = "Name of the cluster; prefix of its roles and node groups."
  type        = string
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the control plane's interfaces and of the nodes."
  type        = list(string)
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the API endpoint from outside the VPC; empty keeps it private."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "KMS key for envelope encryption of Kubernetes secrets and for the control-plane log group."
  type        = string
}

variable "log_retention_days" {
  description = "Retention of the control-plane logs, in days."
  type        = number
}

variable "cpu_node_group" {
  description = "CPU node group: instance types, autoscaling bounds and disk size."
  type        = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gb   = number
  })
}

variable "gpu_node_group" {
  description = "GPU node group: instance types, autoscaling bounds and disk size."
  type        = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gb   = number
  })
}
