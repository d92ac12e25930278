import pytest

from tests.meshproc import Mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, embedded_dir):
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    yield m
    rc = m.stop()
    assert rc == 0, m.proc.tail()
    assert m.service_pids() == [], "orphan processes after pdmesh up stopped"
