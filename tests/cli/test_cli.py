"""The `ferry` command's contract: what it prints and what it stores."""

from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, text

from bench.stack import Stack
from core.keys import hash_key


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(stack: Stack, db: Engine):
    out = stack.ferry("keys", "create", "cli-test", "--project", "alpha")
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-ferry-") and " " not in key
    with db.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys WHERE name = 'cli-test'")).mappings().all()
    assert len(rows) == 1
    assert rows[0]["key_hash"] == hash_key(key)
    assert rows[0]["project"] == "alpha"
    assert key not in str(dict(rows[0]))

    listed = stack.ferry("keys", "list")
    assert rows[0]["id"] in listed and key not in listed


def test_keys_create_admin_marks_the_key_and_list_says_so(stack: Stack, db: Engine):
    out = stack.ferry("keys", "create", "cli-admin", "--project", "ops", "--admin")
    assert "created admin key" in out
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-ferry-")
    ordinary = stack.create_key("cli-ordinary", "ops")
    with db.connect() as conn:
        rows = conn.execute(
            text("SELECT name, admin FROM api_keys WHERE name IN ('cli-admin', 'cli-ordinary')")
        )
        admin = {name: is_admin for name, is_admin in rows}
    assert admin == {"cli-admin": True, "cli-ordinary": False}
    listed = stack.ferry("keys", "list")
    rows = {line.split("\t")[1]: line.split("\t") for line in listed.splitlines()}
    assert rows["cli-admin"][-1] == "admin" and rows["cli-ordinary"][-1] == "project"
    assert key not in listed and ordinary not in listed


def test_revoked_key_gets_401_at_once(stack: Stack):
    key = stack.create_key("to-revoke")
    key_id = [line for line in stack.ferry("keys", "list").splitlines() if "to-revoke" in line]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{stack.base_url}/v1/models", headers=headers).status_code == 200
    stack.ferry("keys", "revoke", key_id[0].split("\t")[0])
    assert httpx.get(f"{stack.base_url}/v1/models", headers=headers).status_code == 401


def test_model_prepare_prints_the_folder_last(stack: Stack):
    folder = Path(stack.ferry("model", "prepare").strip().splitlines()[-1])
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert folder.name == "SmolLM2-135M-Instruct"


def test_db_upgrade_is_idempotent(stack: Stack, db: Engine):
    assert "database at head" in stack.ferry("db", "upgrade")
    from alembic.script import ScriptDirectory

    from cli.main import alembic_config

    head = ScriptDirectory.from_config(alembic_config(stack.database_url)).get_current_head()
    with db.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == head


def test_projects_set_changes_weight_and_retention_and_refuses_what_cannot_be(
    stack: Stack, db: Engine
):
    stack.ferry("projects", "create", "cli-settings")
    out = stack.ferry(
        "projects", "set", "cli-settings", "--weight", "3", "--completions-ttl", "30d",
        "--file-ttl", "36h", "--batch-output-ttl", "7200",
    )  # fmt: skip
    assert "weight 3, completions-ttl 30d, file-ttl 36h, batch-output-ttl 2h" in out
    with db.connect() as conn:
        row = conn.execute(text("SELECT * FROM projects WHERE name = 'cli-settings'")).one()
    assert (row.weight, row.completions_ttl_seconds) == (3, 30 * 86400)
    assert (row.file_ttl_seconds, row.batch_output_ttl_seconds) == (36 * 3600, 7200)
    # Each setting not given stays; 'none' keeps until deleted again.
    out = stack.ferry("projects", "set", "cli-settings", "--file-ttl", "none")
    assert "weight 3, completions-ttl 30d, file-ttl none, batch-output-ttl 2h" in out
    for bad in (["--weight", "0"], ["--file-ttl", "59m"], ["--completions-ttl", "soon"]):
        with pytest.raises(RuntimeError, match="usage"):
            stack.ferry("projects", "set", "cli-settings", *bad)
    with pytest.raises(RuntimeError, match="no project"):
        stack.ferry("projects", "set", "cli-nobody", "--weight", "2")
