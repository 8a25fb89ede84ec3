# What a user puts in a recipe or the environment. No output holds a secret.

output "checkpoints_uri" {
  description = "Where input checkpoints go (recipe base/models URIs)."
  value       = "s3://${module.storage.bucket}/checkpoints"
}

output "merges_uri" {
  description = "Where merge outputs go (recipe output, nightly workdir)."
  value       = "s3://${module.storage.bucket}/merges"
}

output "mlflow_tracking_uri" {
  description = "MLflow tracking URI inside the cluster (recipe register.tracking_uri, MLFLOW_TRACKING_URI); null until mlflow_image is set."
  value       = one(module.mlflow[*].tracking_uri)
}

output "ray_address" {
  description = "Ray client address of the RayCluster in infra/k8s/raycluster.yaml, inside the cluster (RAY_ADDRESS)."
  value       = "ray://${var.ray_cluster_name}-head-svc.${module.kuberay.namespace}.svc.cluster.local:10001"
}

output "kubernetes_namespace" {
  description = "Namespace of the RayCluster, RayJobs and Prefect job pods."
  value       = module.kuberay.namespace
}

output "kubernetes_service_account" {
  description = "Service account (bound to the Ray IAM role) for Ray and Prefect job pods."
  value       = module.kuberay.service_account
}

output "prefect_work_pool" {
  description = "Prefect work pool to create with infra/k8s/prefect-work-pool.json."
  value       = var.prefect_work_pool
}

output "ray_role_arn" {
  description = "IAM role of the Ray service account."
  value       = module.iam.ray_role_arn
}

output "database_secret_arn" {
  description = "Secrets Manager secret holding MLflow's database credentials (read it; the value is never an output)."
  value       = module.database.secret_arn
}

output "image_repository" {
  description = "Container repository to push the amalgam image to."
  value       = module.registry.repository_url
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}
