provider "aws" {
  region = var.region

  default_tags {
    tags = {
      project    = "distill-ray"
      managed_by = "terraform"
    }
  }
}

# Kubernetes and Helm talk to the new cluster with a short-lived token from `aws eks get-token`,
# so no kubeconfig or long-lived credential is written anywhere.
provider "kubernetes" {
  host                   = module.eks.cluster_endpoint
  cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)

  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
  }
}

provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)

    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
  }
}

data "aws_caller_identity" "current" {}

# The zones the VPC spans, named (not "whatever the region lists"): the subnets do not move when AWS
# adds a zone (CKV_AWS_394); `state` still drops a named zone that is down.
data "aws_availability_zones" "available" {
  state = "available"

  filter {
    name   = "zone-name"
    values = formatlist("%s%s", var.region, var.zone_suffixes)
  }
}
