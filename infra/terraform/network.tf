locals {
  azs = data.aws_availability_zones.available.names # var.zone_suffixes, those up
}

# Nodes live in private subnets; the public ones hold the NAT gateway and load balancers only.
module "vpc" {
  #checkov:skip=CKV_TF_1:Pinned to one exact registry release (not a range); a commit hash needs a git source, which loses the registry version that upgrades are reviewed against.
  source  = "terraform-aws-modules/vpc/aws"
  version = "5.16.0"

  name = var.name
  cidr = var.vpc_cidr
  azs  = local.azs

  private_subnets = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 4, i)]
  public_subnets  = [for i, _ in local.azs : cidrsubnet(var.vpc_cidr, 8, 48 + i)]

  enable_nat_gateway   = true
  single_nat_gateway   = true # one NAT for the cluster: cheaper; nodes only pull images and call the teacher API
  enable_dns_hostnames = true

  enable_flow_log                                 = true
  create_flow_log_cloudwatch_log_group            = true
  create_flow_log_cloudwatch_iam_role             = true
  flow_log_cloudwatch_log_group_retention_in_days = 90

  manage_default_security_group  = true
  default_security_group_ingress = []
  default_security_group_egress  = []

  public_subnet_tags  = { "kubernetes.io/role/elb" = 1 }
  private_subnet_tags = { "kubernetes.io/role/internal-elb" = 1 }
}
