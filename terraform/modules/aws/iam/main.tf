# IAM roles for service accounts, least privilege on the bucket's prefixes:
#   Ray pods (and Prefect job pods, same service account): checkpoints/ and merges/
#   the MLflow server: mlflow-artifacts/
# Each role can be assumed only by its one Kubernetes service account.

locals {
  roles = {
    ray = {
      service_account = var.ray_service_account
      prefixes        = ["checkpoints", "merges"]
    }
    mlflow = {
      service_account = var.mlflow_service_account
      prefixes        = ["mlflow-artifacts"]
    }
  }
}

data "aws_iam_policy_document" "assume" {
  for_each = local.roles

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${each.value.service_account.namespace}:${each.value.service_account.name}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${var.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "access" {
  for_each = local.roles

  # s3fs checks that the bucket exists (before writing under it) with HeadBucket, then
  # GetBucketLocation: the second reveals only the bucket's region.
  statement {
    sid       = "FindBucket"
    actions   = ["s3:GetBucketLocation"]
    resources = [var.bucket_arn]
  }

  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = flatten([for p in each.value.prefixes : [p, "${p}/*"]])
    }
  }

  statement {
    sid       = "ReadWriteOwnPrefixes"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    resources = [for p in each.value.prefixes : "${var.bucket_arn}/${p}/*"]
  }

  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role" "this" {
  for_each = local.roles

  name               = "${var.name}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
}

resource "aws_iam_role_policy" "this" {
  for_each = local.roles

  name   = "bucket-prefixes"
  role   = aws_iam_role.this[each.key].id
  policy = data.aws_iam_policy_document.access[each.key].json
}
