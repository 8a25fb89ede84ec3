variable "name" {
  description = "Prefix of the key's alias and description."
  type        = string
}
