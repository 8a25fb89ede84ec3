"""terraform/ without terraform: every file parses, every module call fits the module it calls,
variables and outputs are documented, nothing is public, the IAM roles stay on their prefixes,
and the layout follows terraform fmt's rules. (No terraform binary or provider can be had
here: docs/scale-out.md says what this does and does not replace.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.infra.tools import (
    TERRAFORM,
    all_resources,
    module,
    named,
    parse_module,
    resources,
    tf_files,
    tf_modules,
)

MODULE_ARGS = {"source", "providers", "depends_on", "count", "for_each"}


def rel(path: Path) -> str:
    return str(path.relative_to(TERRAFORM))


def test_every_file_parses() -> None:
    hcl2 = module("hcl2")
    files = tf_files()
    assert len(files) >= 20, files
    for path in files:
        with path.open() as f:
            assert hcl2.load(f), rel(path)


@pytest.mark.parametrize("folder", tf_modules(), ids=rel)
def test_variables_and_outputs_are_documented(folder: Path) -> None:
    blocks = parse_module(folder)
    for name, var in named(blocks, "variable").items():
        assert var.get("description", "").strip(), f"{rel(folder)}: variable {name}: no description"
        assert var.get("type"), f"{rel(folder)}: variable {name}: no type"
    for name, out in named(blocks, "output").items():
        assert out.get("description", "").strip(), f"{rel(folder)}: output {name}: no description"


def test_every_module_call_fits_its_module() -> None:
    """What `terraform validate` would say of the wiring: each call passes every required
    variable of the module it calls, nothing it does not declare, and reads only its outputs."""
    calls = 0
    for folder in tf_modules():
        blocks = parse_module(folder)
        text = "\n".join(p.read_text() for p in folder.glob("*.tf"))
        for name, call in named(blocks, "module").items():
            target = (folder / call["source"]).resolve()
            assert target.is_dir(), f"{rel(folder)}: module {name}: no folder {call['source']}"
            callee = parse_module(target)
            declared = named(callee, "variable")
            passed = set(call) - MODULE_ARGS
            assert passed <= set(declared), f"module {name}: undeclared {passed - set(declared)}"
            required = {v for v, body in declared.items() if "default" not in body}
            assert required <= passed, f"module {name}: missing {required - passed}"
            outputs = set(named(callee, "output"))
            used = set(re.findall(rf"\bmodule\.{name}(?:\[[^\]]*\])?\.(\w+)", text))
            assert used <= outputs, f"module {name}: no output {used - outputs}"
            calls += 1
    assert calls >= 8


def test_every_variable_is_used() -> None:
    for folder in tf_modules():
        blocks = parse_module(folder)
        text = "\n".join(p.read_text() for p in folder.glob("*.tf"))
        for name in named(blocks, "variable"):
            assert re.search(rf"\bvar\.{name}\b", text), f"{rel(folder)}: variable {name} unused"


def test_bucket_is_private_versioned_encrypted_and_tls_only() -> None:
    blocks = parse_module(TERRAFORM / "modules/aws/storage")
    (block,) = resources(blocks, "aws_s3_bucket_public_access_block").values()
    for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls"):
        assert block[flag] is True, flag
    assert block["restrict_public_buckets"] is True
    (versioning,) = resources(blocks, "aws_s3_bucket_versioning").values()
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    (sse,) = resources(blocks, "aws_s3_bucket_server_side_encryption_configuration").values()
    default = sse["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert default["sse_algorithm"] == "aws:kms" and default["kms_master_key_id"]
    (ownership,) = resources(blocks, "aws_s3_bucket_ownership_controls").values()
    assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"  # no ACLs at all
    statements = resources(blocks, "aws_iam_policy_document", "data")["tls_only"]["statement"]
    deny_http = [
        s
        for s in statements
        if s["effect"] == "Deny"
        and any(
            c["variable"] == "aws:SecureTransport" and c["values"] == ["false"]
            for c in s["condition"]
        )
    ]
    assert deny_http, "no statement denies requests without TLS"
    assert not resources(blocks, "aws_s3_bucket_acl"), "ACLs are disabled; none may be set"


def test_database_is_private_and_encrypted() -> None:
    (db,) = all_resources("aws_db_instance").values()
    assert db["publicly_accessible"] is False
    assert db["storage_encrypted"] is True and db["kms_key_id"]
    assert db["deletion_protection"] is True
    # the password comes from random_password and is never an output in plain text
    assert db["password"] == "${random_password.mlflow.result}"
    for folder in tf_modules():
        for name, out in named(parse_module(folder), "output").items():
            if re.search(r"random_password|local\.uri|secret_string", str(out["value"])):
                assert out.get("sensitive") is True, f"{rel(folder)}: output {name}"
    root_outputs = named(parse_module(TERRAFORM), "output")
    assert not any(out.get("sensitive") for out in root_outputs.values()), "root: no secrets"


def test_no_ingress_from_the_internet() -> None:
    """No security group admits 0.0.0.0/0 or ::/0; the database only admits the nodes."""
    open_cidrs = {"0.0.0.0/0", "::/0"}
    for key, sg in all_resources("aws_security_group").items():
        for rule in sg.get("ingress", []):
            cidrs = set(rule.get("cidr_blocks", [])) | set(rule.get("ipv6_cidr_blocks", []))
            assert not cidrs & open_cidrs, key
    rules = all_resources("aws_vpc_security_group_ingress_rule")
    assert rules
    for key, rule in rules.items():
        assert rule.get("cidr_ipv4") not in open_cidrs and rule.get("cidr_ipv6") not in open_cidrs
        assert rule.get("referenced_security_group_id"), f"{key}: ingress from a CIDR"
    assert not all_resources("aws_security_group_rule"), "use aws_vpc_security_group_*_rule"
    (cluster,) = all_resources("aws_eks_cluster").values()
    vpc = cluster["vpc_config"][0]
    assert vpc["endpoint_private_access"] is True
    # public only when the operator lists CIDRs, and then only those
    assert vpc["endpoint_public_access"] == "${length(var.api_allowed_cidrs) > 0}"
    root = named(parse_module(TERRAFORM), "variable")
    assert root["api_allowed_cidrs"]["default"] == []
    for key, subnet in all_resources("aws_subnet").items():
        assert subnet.get("map_public_ip_on_launch") in (None, False), key


def test_node_groups_cpu_and_gpu_with_taint_and_labels() -> None:
    text = (TERRAFORM / "modules/aws/eks/main.tf").read_text()
    gpu = text[text.index("gpu = merge(") :]
    assert '"amalgam.dev/node-kind" = "gpu"' in gpu and "AL2023_x86_64_NVIDIA" in gpu
    # the label NVIDIA's device plugin chart selects nodes by (modules/k8s/kuberay)
    assert '"nvidia.com/gpu.present" = "true"' in gpu
    assert 'key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE"' in gpu
    assert '"amalgam.dev/node-kind" = "cpu"' in text[: text.index("gpu = merge(")]
    (groups,) = all_resources("aws_eks_node_group").values()
    assert groups["for_each"] == "${local.node_groups}"
    assert groups["dynamic"][0]["taint"]["for_each"] == "${each.value.taints}"
    (template,) = all_resources("aws_launch_template").values()
    metadata = template["metadata_options"][0]
    assert metadata["http_tokens"] == "required" and metadata["http_put_response_hop_limit"] == 1


def test_service_account_roles_stay_on_their_prefixes() -> None:
    """Ray pods: checkpoints/ and merges/ only; MLflow: mlflow-artifacts/ only; each role
    assumable only by its own service account."""
    blocks = parse_module(TERRAFORM / "modules/aws/iam")
    (local_block,) = blocks["locals"]
    roles = local_block["roles"]
    assert {name: role["prefixes"] for name, role in roles.items()} == {
        "ray": ["checkpoints", "merges"],
        "mlflow": ["mlflow-artifacts"],
    }
    assert roles["ray"]["service_account"] == "${var.ray_service_account}"
    assert roles["mlflow"]["service_account"] == "${var.mlflow_service_account}"
    documents = resources(blocks, "aws_iam_policy_document", "data")
    access = documents["access"]["statement"]
    # s3fs's bucket probe must succeed, or it tries to create the bucket before a write
    assert any(s["actions"] == ["s3:GetBucketLocation"] for s in access)
    for statement in access:
        for arn in statement["resources"]:
            # object rights only under a prefix, never the whole bucket's objects
            assert not arn.endswith("bucket_arn}/*"), arn
        if "s3:ListBucket" in statement["actions"]:
            assert statement["condition"][0]["variable"] == "s3:prefix"
        assert "*" not in statement["actions"] and not any(
            a.endswith(":*") for a in statement["actions"]
        )
    conditions = documents["assume"]["statement"][0]["condition"]
    assert {c["variable"].rsplit(":", 1)[1] for c in conditions} == {"sub", "aud"}
    assert all(c["test"] == "StringEquals" for c in conditions)


def test_outputs_a_recipe_needs() -> None:
    outputs = named(parse_module(TERRAFORM), "output")
    assert outputs["checkpoints_uri"]["value"].startswith("s3://")
    assert outputs["merges_uri"]["value"].startswith("s3://")
    assert outputs["ray_address"]["value"].startswith("ray://")
    assert "mlflow_tracking_uri" in outputs and "prefect_work_pool" in outputs


def fmt_problems(path: Path) -> list[str]:
    """terraform fmt's layout rules that can be checked line by line: two-space indents, no
    tabs or trailing blanks, one newline at the end, and the `=` of adjacent single-line
    attributes at one indent aligned one space after the longest name."""
    text = path.read_text()
    problems = []
    if not text.endswith("\n") or text.endswith("\n\n"):
        problems.append("must end with exactly one newline")
    lines = text.split("\n")
    attr = re.compile(r'^( *)("[^"]+"|[\w-]+)( *)= ')
    group: list[tuple[int, re.Match[str]]] = []

    def close() -> None:
        if group:
            width = max(len(m.group(2)) for _, m in group)
            for n, m in group:
                if len(m.group(2)) + len(m.group(3)) != width + 1:
                    problems.append(f"line {n}: '=' not aligned with its neighbours")
        group.clear()

    for n, line in enumerate(lines, 1):
        if "\t" in line or line != line.rstrip():
            problems.append(f"line {n}: tab or trailing blank")
        indent = len(line) - len(line.lstrip(" "))
        if line.strip() and indent % 2:
            problems.append(f"line {n}: indent of {indent} spaces")
        m = attr.match(line)
        if m and group and len(group[-1][1].group(1)) == len(m.group(1)) and group[-1][0] == n - 1:
            group.append((n, m))
            continue
        close()
        if m:
            group.append((n, m))
    close()
    return problems


@pytest.mark.parametrize("path", tf_files(), ids=rel)
def test_fmt_layout(path: Path) -> None:
    assert fmt_problems(path) == []


def test_fmt_check_finds_what_terraform_fmt_would_change(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tf"
    bad.write_text('resource "x" "y" {\n  name = "a"\n  longer_name = "b"\n   odd = 1\n}\n\n')
    problems = fmt_problems(bad)
    assert "line 2: '=' not aligned with its neighbours" in problems
    assert "line 4: indent of 3 spaces" in problems
    assert "must end with exactly one newline" in problems


def test_example_tfvars_set_only_declared_variables_and_every_required_one() -> None:
    hcl2 = module("hcl2")
    with (TERRAFORM / "terraform.tfvars.example").open() as f:
        example = set(hcl2.load(f)) - {"__comments__"}
    declared = named(parse_module(TERRAFORM), "variable")
    assert example <= set(declared), example - set(declared)
    assert {v for v, body in declared.items() if "default" not in body} <= example


def test_cluster_autoscaler_changes_only_this_clusters_node_groups() -> None:
    blocks = parse_module(TERRAFORM / "modules/aws/autoscaler")
    statements = resources(blocks, "aws_iam_policy_document", "data")["scale"]["statement"]
    for statement in statements:
        writes = [a for a in statement["actions"] if not re.search(r":(Describe|Get)", a)]
        if writes:
            (condition,) = statement["condition"]
            assert condition["variable"].endswith("/${var.cluster_name}"), statement["sid"]
            assert condition["values"] == ["owned"]
        if statement["resources"] == ["*"]:
            assert not writes, statement["sid"]
