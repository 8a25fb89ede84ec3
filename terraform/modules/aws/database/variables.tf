variable "name" {
  description = "Prefix of the database's identifier, subnet group, security group and secret."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the database."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the database (at least two zones)."
  type        = list(string)
}

variable "client_security_group_id" {
  description = "Security group of the clients allowed to connect (the EKS cluster's nodes)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the storage, Performance Insights and the credentials secret."
  type        = string
}

variable "instance_class" {
  description = "RDS instance class."
  type        = string
}

variable "storage_gb" {
  description = "Allocated storage in GB (autoscales up to four times this)."
  type        = number
}

variable "log_retention_days" {
  description = "Retention of the exported Postgres logs, in days."
  type        = number
}
