# Cluster Autoscaler: adds a node when a pod cannot be scheduled (a Ray worker pod the Ray
# autoscaler created, a Prefect job) and removes idle ones, within each node group's bounds.
# It finds the managed node groups by the tags EKS puts on their Auto Scaling groups and reads
# an empty group's labels and taints from EKS, so the GPU group scales up from zero.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  namespace       = "kube-system"
  service_account = "cluster-autoscaler"
  account         = data.aws_caller_identity.current.account_id
  partition       = data.aws_partition.current.partition
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${local.namespace}:${local.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "scale" {
  # Read-only calls that IAM cannot limit to a resource.
  statement {
    sid     = "Discover"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "ReadOwnNodeGroups"
    actions   = ["eks:DescribeNodegroup"]
    resources = ["arn:${local.partition}:eks:${var.region}:${local.account}:nodegroup/${var.cluster_name}/*/*"]
  }

  # Changes only to this cluster's node groups.
  statement {
    sid       = "ScaleOwnNodeGroups"
    actions   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
    resources = ["arn:${local.partition}:autoscaling:${var.region}:${local.account}:autoScalingGroup:*:autoScalingGroupName/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${var.cluster_name}"
      values   = ["owned"]
    }
  }
}

resource "aws_iam_role" "this" {
  name               = "${var.cluster_name}-cluster-autoscaler"
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_role_policy" "this" {
  name   = "scale-own-node-groups"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.scale.json
}

resource "helm_release" "this" {
  name       = "cluster-autoscaler"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.chart_version
  namespace  = local.namespace
  atomic     = true

  set = [
    { name = "autoDiscovery.clusterName", value = var.cluster_name },
    { name = "awsRegion", value = var.region },
    { name = "image.tag", value = "v${var.kubernetes_version}.0" },
    { name = "rbac.serviceAccount.name", value = local.service_account },
    { name = "rbac.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn", value = aws_iam_role.this.arn },
    { name = "extraArgs.balance-similar-node-groups", value = "true" },
    { name = "extraArgs.scale-down-unneeded-time", value = "10m" },
  ]
}
