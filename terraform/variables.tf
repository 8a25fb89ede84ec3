variable "name" {
  description = "Name of the stack: prefix of the cluster, bucket, database and roles."
  type        = string
  default     = "amalgam"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.name))
    error_message = "name: 3-31 lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "AWS region of every resource."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Extra tags put on every AWS resource."
  type        = map(string)
  default     = {}
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC the cluster and the database live in."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zones" {
  description = "Availability zones to spread subnets over (at least two: EKS and RDS need two)."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b"]
}

variable "bucket_name" {
  description = "Globally unique name of the S3 bucket for checkpoints, merges and MLflow artifacts."
  type        = string
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version."
  type        = string
  default     = "1.33"
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the EKS API endpoint from outside the VPC (an operator network or VPN); empty keeps the endpoint private."
  type        = list(string)
  default     = []
}

variable "cpu_node_group" {
  description = "CPU node group: instance types and autoscaling bounds (Ray head, CPU workers, MLflow, Prefect jobs)."
  type        = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gb   = number
  })
  default = {
    instance_types = ["m7i.4xlarge"]
    min_size       = 1
    max_size       = 8
    desired_size   = 2
    disk_size_gb   = 200
  }
}

variable "gpu_node_group" {
  description = "GPU node group (tainted nvidia.com/gpu=present:NoSchedule): instance types and autoscaling bounds; min_size 0 scales to zero when idle."
  type        = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gb   = number
  })
  default = {
    instance_types = ["g6e.4xlarge"]
    min_size       = 0
    max_size       = 4
    desired_size   = 0
    disk_size_gb   = 400
  }
}

variable "kuberay_version" {
  description = "Version of the KubeRay operator Helm chart (infra/k8s/ray*.yaml were checked against its CRDs)."
  type        = string
  default     = "1.7.0"
}

variable "cluster_autoscaler_version" {
  description = "Version of the cluster-autoscaler Helm chart; the autoscaler image it runs is the one of kubernetes_version's minor release."
  type        = string
  default     = "9.43.1"
}

variable "ray_namespace" {
  description = "Kubernetes namespace of the RayCluster and of Prefect's job pods (infra/k8s uses the same name)."
  type        = string
  default     = "amalgam"
}

variable "ray_service_account" {
  description = "Kubernetes service account of Ray pods and Prefect job pods, bound to the Ray IAM role."
  type        = string
  default     = "amalgam-ray"
}

variable "ray_cluster_name" {
  description = "metadata.name of the RayCluster in infra/k8s/raycluster.yaml (gives the Ray address output)."
  type        = string
  default     = "amalgam"
}

variable "mlflow_image" {
  description = "Container image the MLflow server runs, pinned by digest: the amalgam image (infra/docker/Dockerfile) holds mlflow, boto3 and the Postgres driver. Null (the first apply, before the image is pushed) leaves the server out."
  type        = string
  default     = null

  validation {
    condition     = var.mlflow_image == null || can(regex("@sha256:[0-9a-f]{64}$", var.mlflow_image))
    error_message = "mlflow_image: pin the image by digest (REPOSITORY@sha256:...), as `docker push` prints it."
  }
}

variable "database_instance_class" {
  description = "RDS instance class of MLflow's Postgres database."
  type        = string
  default     = "db.t4g.medium"
}

variable "database_storage_gb" {
  description = "Allocated storage of MLflow's Postgres database, in GB."
  type        = number
  default     = 50
}

variable "prefect_work_pool" {
  description = "Name of the Prefect Kubernetes work pool the deployments in infra/prefect.yaml use."
  type        = string
  default     = "amalgam"
}

variable "log_retention_days" {
  description = "Retention of the VPC flow logs and EKS control-plane logs in CloudWatch, in days."
  type        = number
  default     = 365
}
