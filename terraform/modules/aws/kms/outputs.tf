output "key_arn" {
  description = "ARN of the stack's KMS key."
  value       = aws_kms_key.this.arn
}
