# Cloud-neutral: the MLflow tracking server as a Deployment behind a ClusterIP Service. It
# proxies artifacts (--serve-artifacts), so clients need no bucket rights of their own: only
# this pod's identity may touch mlflow-artifacts/.

locals {
  host   = "mlflow.${var.namespace}.svc.cluster.local"
  labels = { "app.kubernetes.io/name" = "mlflow" }
}

resource "kubernetes_namespace_v1" "this" {
  metadata {
    name = var.namespace
  }
}

resource "kubernetes_service_account_v1" "this" {
  metadata {
    name        = var.service_account
    namespace   = kubernetes_namespace_v1.this.metadata[0].name
    annotations = var.role_annotations
  }
}

resource "kubernetes_secret_v1" "backend" {
  metadata {
    name      = "mlflow-backend-store"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
  }

  data = {
    uri = var.backend_store_uri
  }
}

resource "kubernetes_deployment_v1" "this" {
  #checkov:skip=CKV_K8S_14:the image is a variable; the root module's validation requires a digest
  #checkov:skip=CKV_K8S_43:the image is a variable; the root module's validation requires a digest
  metadata {
    name      = "mlflow"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
    labels    = local.labels
  }

  spec {
    replicas = var.replicas

    selector {
      match_labels = local.labels
    }

    template {
      metadata {
        labels = local.labels
      }

      spec {
        service_account_name            = kubernetes_service_account_v1.this.metadata[0].name
        automount_service_account_token = true
        node_selector                   = { "amalgam.dev/node-kind" = "cpu" }

        security_context {
          run_as_non_root = true
          run_as_user     = 10001
          run_as_group    = 10001
          fs_group        = 10001

          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        container {
          name              = "mlflow"
          image             = var.image
          image_pull_policy = "Always"
          # The URI (with its password) is read from the mounted secret, never put in the env.
          command = ["/bin/sh", "-c"]
          args    = [join(" ", [
            "exec mlflow server",
            "--backend-store-uri \"$(cat /run/secrets/mlflow/uri)\"",
            "--serve-artifacts --artifacts-destination ${var.artifacts_destination}",
            "--host 0.0.0.0 --port 5000 --workers 2",
            "--allowed-hosts ${local.host},${local.host}:5000,mlflow.${var.namespace}:5000,mlflow.${var.namespace}.svc:5000",
          ])]

          env {
            name  = "MLFLOW_DISABLE_TELEMETRY"
            value = "true"
          }

          port {
            container_port = 5000
            name           = "http"
          }

          resources {
            requests = { cpu = "500m", memory = "1Gi" }
            limits   = { cpu = "2", memory = "4Gi" }
          }

          liveness_probe {
            http_get {
              path = "/health"
              port = "http"
            }
            initial_delay_seconds = 30
            period_seconds        = 20
          }

          readiness_probe {
            http_get {
              path = "/health"
              port = "http"
            }
            period_seconds = 10
          }

          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            privileged                 = false

            capabilities {
              drop = ["ALL"]
            }
          }

          volume_mount {
            name       = "backend-store"
            mount_path = "/run/secrets/mlflow"
            read_only  = true
          }

          volume_mount {
            name       = "tmp"
            mount_path = "/tmp"
          }
        }

        volume {
          name = "backend-store"

          secret {
            secret_name = kubernetes_secret_v1.backend.metadata[0].name
          }
        }

        volume {
          name = "tmp"

          empty_dir {}
        }
      }
    }
  }
}

resource "kubernetes_service_v1" "this" {
  metadata {
    name      = "mlflow"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
  }

  spec {
    type     = "ClusterIP"
    selector = local.labels

    port {
      name        = "http"
      port        = 5000
      target_port = "http"
    }
  }
}
