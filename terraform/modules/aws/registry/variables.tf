variable "name" {
  description = "Name of the repository."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the images."
  type        = string
}

variable "keep_images" {
  description = "How many images to keep; older ones expire."
  type        = number
  default     = 50
}
