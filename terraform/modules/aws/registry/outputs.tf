output "repository_url" {
  description = "URL to tag and push the image to."
  value       = aws_ecr_repository.this.repository_url
}
