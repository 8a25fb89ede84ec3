output "namespace" {
  description = "Namespace of the RayCluster and Prefect job pods."
  value       = kubernetes_namespace_v1.ray.metadata[0].name
}

output "service_account" {
  description = "Service account of the Ray and Prefect job pods."
  value       = kubernetes_service_account_v1.ray.metadata[0].name
}
