# MLflow's backend store: Postgres on RDS in the private subnets, encrypted, reachable only
# from the cluster's nodes. The password is generated here and kept in Secrets Manager; no
# output shows it.

resource "random_password" "mlflow" {
  length  = 32
  special = false
}

resource "aws_secretsmanager_secret" "mlflow_db" {
  #checkov:skip=CKV2_AWS_57:automatic rotation needs a rotation Lambda and a restart of MLflow; rotate by tainting random_password.mlflow
  name_prefix = "${var.name}-mlflow-db-"
  description = "MLflow's Postgres credentials and SQLAlchemy URI"
  kms_key_id  = var.kms_key_arn
}

resource "aws_secretsmanager_secret_version" "mlflow_db" {
  secret_id     = aws_secretsmanager_secret.mlflow_db.id
  secret_string = jsonencode({
    username = aws_db_instance.mlflow.username
    password = random_password.mlflow.result
    host     = aws_db_instance.mlflow.address
    port     = aws_db_instance.mlflow.port
    dbname   = aws_db_instance.mlflow.db_name
    uri      = local.uri
  })
}

locals {
  uri = "postgresql+psycopg2://mlflow:${random_password.mlflow.result}@${aws_db_instance.mlflow.address}:${aws_db_instance.mlflow.port}/mlflow?sslmode=require"
}

resource "aws_db_subnet_group" "this" {
  name       = "${var.name}-mlflow"
  subnet_ids = var.subnet_ids
}

resource "aws_security_group" "db" {
  name        = "${var.name}-mlflow-db"
  description = "MLflow Postgres: reachable from the EKS nodes only"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "from_nodes" {
  security_group_id            = aws_security_group.db.id
  description                  = "Postgres from the EKS cluster's nodes"
  referenced_security_group_id = var.client_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_db_parameter_group" "this" {
  name   = "${var.name}-mlflow-pg16"
  family = "postgres16"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }
}

resource "aws_iam_role" "monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "monitoring" {
  role       = aws_iam_role.monitoring.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "mlflow" {
  identifier     = "${var.name}-mlflow"
  engine         = "postgres"
  engine_version = "16"
  instance_class = var.instance_class

  db_name  = "mlflow"
  username = "mlflow"
  password = random_password.mlflow.result

  allocated_storage     = var.storage_gb
  max_allocated_storage = var.storage_gb * 4
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = var.kms_key_arn

  db_subnet_group_name   = aws_db_subnet_group.this.name
  vpc_security_group_ids = [aws_security_group.db.id]
  parameter_group_name   = aws_db_parameter_group.this.name
  publicly_accessible    = false
  multi_az               = true

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  backup_retention_period             = 14
  copy_tags_to_snapshot               = true
  deletion_protection                 = true
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${var.name}-mlflow-final"
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]

  performance_insights_enabled    = true
  performance_insights_kms_key_id = var.kms_key_arn
  monitoring_interval             = 60
  monitoring_role_arn             = aws_iam_role.monitoring.arn

  depends_on = [aws_cloudwatch_log_group.postgres]
}

# Created before the instance so the exported logs get a retention and the stack's key.
resource "aws_cloudwatch_log_group" "postgres" {
  for_each = toset(["postgresql", "upgrade"])

  name              = "/aws/rds/instance/${var.name}-mlflow/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
}
