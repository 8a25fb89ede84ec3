# Cloud-neutral: the KubeRay operator, NVIDIA's device plugin (so nvidia.com/gpu is a
# schedulable resource on GPU nodes), and the namespace and service account the RayCluster in
# infra/k8s/raycluster.yaml runs under. The RayCluster itself is applied with kubectl.

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.chart_version
  namespace        = "kuberay-system"
  create_namespace = true
  atomic           = true
}

resource "helm_release" "nvidia_device_plugin" {
  name             = "nvidia-device-plugin"
  repository       = "https://nvidia.github.io/k8s-device-plugin"
  chart            = "nvidia-device-plugin"
  version          = "0.17.1"
  namespace        = "nvidia-device-plugin"
  create_namespace = true
  atomic           = true
  # The chart's defaults fit the GPU node group: its daemonset tolerates the nvidia.com/gpu
  # taint and runs only on nodes labelled nvidia.com/gpu.present=true.
}

resource "kubernetes_namespace_v1" "ray" {
  metadata {
    name = var.namespace
  }
}

resource "kubernetes_service_account_v1" "ray" {
  metadata {
    name        = var.service_account
    namespace   = kubernetes_namespace_v1.ray.metadata[0].name
    annotations = var.role_annotations
  }
}
