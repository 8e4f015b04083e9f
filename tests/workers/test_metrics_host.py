"""A worker's metrics listen where FERRY_METRICS_HOST says: this host only, unless told."""

import psutil

from bench.stack import free_port
from core.settings import WorkerSettings
from workers import metrics


def _listening_on(port: int) -> list[str]:
    return [
        conn.laddr.ip
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    ]


def test_metrics_listen_on_the_host_the_setting_names() -> None:
    settings = WorkerSettings(_env_file=None, metrics_port=free_port())
    assert settings.metrics_host == "127.0.0.1"
    metrics.serve(settings.metrics_port, host=settings.metrics_host)
    assert _listening_on(settings.metrics_port) == ["127.0.0.1"]
