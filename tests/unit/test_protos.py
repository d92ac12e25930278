"""Generated code under pdmesh/v1 is exactly what protos/generate.sh produces (never hand-edited)."""

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run(["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True)
    gen = sorted(p.name for p in (tmp_path / "pdmesh" / "v1").iterdir() if p.suffix in (".py", ".pyi"))
    committed = sorted(p.name for p in (ROOT / "pdmesh" / "v1").iterdir() if p.suffix in (".py", ".pyi"))
    assert gen == committed
    for name in gen:
        assert filecmp.cmp(tmp_path / "pdmesh" / "v1" / name, ROOT / "pdmesh" / "v1" / name, shallow=False), f"{name} differs: run protos/generate.sh"


def test_services_import_their_contract():
    from pdmesh.v1 import decode_pb2_grpc, kv_transfer_pb2_grpc, prefill_pb2_grpc, scheduler_pb2_grpc

    for mod, svc in ((decode_pb2_grpc, "Decode"), (prefill_pb2_grpc, "Prefill"), (scheduler_pb2_grpc, "Scheduler"),
                     (kv_transfer_pb2_grpc, "KVTransfer")):
        assert hasattr(mod, f"{svc}Stub") and hasattr(mod, f"add_{svc}Servicer_to_server")
