# The amalgam stack on AWS. Provider-specific parts live in modules/aws/*; what runs on
# Kubernetes (KubeRay, the MLflow server) lives in modules/k8s/* and works on any cluster.
# Another cloud adds modules/<cloud>/{network,kms,storage,registry,database,eks,autoscaler,iam} with the same outputs.

module "kms" {
  source = "./modules/aws/kms"

  name = var.name
}

module "network" {
  source = "./modules/aws/network"

  name               = var.name
  vpc_cidr           = var.vpc_cidr
  availability_zones = var.availability_zones
  log_retention_days = var.log_retention_days
  kms_key_arn        = module.kms.key_arn
  cluster_name       = var.name
}

module "storage" {
  source = "./modules/aws/storage"

  bucket_name = var.bucket_name
  kms_key_arn = module.kms.key_arn
}

module "registry" {
  source = "./modules/aws/registry"

  name        = var.name
  kms_key_arn = module.kms.key_arn
}

module "eks" {
  source = "./modules/aws/eks"

  name               = var.name
  kubernetes_version = var.kubernetes_version
  subnet_ids         = module.network.private_subnet_ids
  api_allowed_cidrs  = var.api_allowed_cidrs
  kms_key_arn        = module.kms.key_arn
  log_retention_days = var.log_retention_days
  cpu_node_group     = var.cpu_node_group
  gpu_node_group     = var.gpu_node_group
}

module "autoscaler" {
  source = "./modules/aws/autoscaler"

  cluster_name       = module.eks.cluster_name
  kubernetes_version = var.kubernetes_version
  region             = var.region
  oidc_provider_arn  = module.eks.oidc_provider_arn
  oidc_issuer        = module.eks.oidc_issuer
  chart_version      = var.cluster_autoscaler_version
}

module "database" {
  source = "./modules/aws/database"

  name                     = var.name
  vpc_id                   = module.network.vpc_id
  subnet_ids               = module.network.private_subnet_ids
  client_security_group_id = module.eks.cluster_security_group_id
  kms_key_arn              = module.kms.key_arn
  instance_class           = var.database_instance_class
  storage_gb               = var.database_storage_gb
  log_retention_days       = var.log_retention_days
}

module "iam" {
  source = "./modules/aws/iam"

  name                   = var.name
  oidc_provider_arn      = module.eks.oidc_provider_arn
  oidc_issuer            = module.eks.oidc_issuer
  bucket_arn             = module.storage.bucket_arn
  kms_key_arn            = module.kms.key_arn
  ray_service_account    = { namespace = var.ray_namespace, name = var.ray_service_account }
  mlflow_service_account = { namespace = local.mlflow_namespace, name = "mlflow" }
}

locals {
  mlflow_namespace = "mlflow"
}

module "kuberay" {
  source = "./modules/k8s/kuberay"

  chart_version    = var.kuberay_version
  namespace        = var.ray_namespace
  service_account  = var.ray_service_account
  role_annotations = { "eks.amazonaws.com/role-arn" = module.iam.ray_role_arn }
}

module "mlflow" {
  source = "./modules/k8s/mlflow"
  count  = var.mlflow_image == null ? 0 : 1

  namespace             = local.mlflow_namespace
  service_account       = "mlflow"
  role_annotations      = { "eks.amazonaws.com/role-arn" = module.iam.mlflow_role_arn }
  image                 = var.mlflow_image
  backend_store_uri     = module.database.backend_store_uri
  artifacts_destination = "s3://${module.storage.bucket}/mlflow-artifacts"
}
