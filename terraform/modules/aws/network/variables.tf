variable "name" {
  description = "Prefix of every resource's name."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC."
  type        = string
}

variable "availability_zones" {
  description = "Availability zones: one public and one private subnet in each."
  type        = list(string)
}

variable "log_retention_days" {
  description = "Retention of the VPC flow logs, in days."
  type        = number
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the flow-log group."
  type        = string
}

variable "cluster_name" {
  description = "EKS cluster name, tagged on subnets so load balancers find them."
  type        = string
}
