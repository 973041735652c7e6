"""A three-node Ray cluster on this machine serving polyhead, for tests/integration/test_cluster.py.

Run as its own process (the test session's own Ray cannot share a process with a second cluster):

    python tests/integration/cluster_harness.py <work folder> <port> <admin key>

`ray.cluster_utils.Cluster` starts a head node (Serve's controller and proxy, the ingress, pinned there by
ingress_resources, and the raystore actor that owns the adapter store) and two worker nodes with one model
replica each (replica_resources). Nodes share nothing by the filesystem that polyhead uses: the store is
`raystore://<work>/store`, on the head's disk behind its actor; each node caches fetched versions under its
own Ray node id (adapters_store/raystore.py). On stdin it takes one command per line and answers one JSON line
on stdout each:

    nodes           {"head": id, "workers": [id, ...]}
    remove <i>      kill worker node i at once (no graceful shutdown): {"removed": id}
    stop            shut everything down and exit
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def say(message: dict) -> None:
    print(json.dumps(message), flush=True)


def main(work: Path, port: int, admin_key: str) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serving.app import build_app

    node_args = {"node_ip_address": "127.0.0.1", "include_dashboard": False,
                 "object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, num_cpus=1))
    workers = [cluster.add_node(**node_args, num_cpus=1, resources={"polyhead_model": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        cfg = {"num_replicas": 2, "request_router": "affinity", "affinity_homes": 1, "max_slots": 4,
               "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "max_ongoing_requests": 64,
               "max_queued_requests": 512, "max_pending_rows": 512, "max_queue_wait_s": 0,
               "num_threads": 1, "num_cpus": 0.5, "replica_resources": {"polyhead_model": 1},
               "ingress_num_cpus": 0.05, "ingress_resources": {"node:__internal_head__": 0.01},
               "admin_api_key": admin_key, "metrics_push_s": 0.2, "store_root": f"raystore://{work}/store",
               "store_ttl_s": 0.2, "retry_after_s": 1}
        serve.run(build_app(cfg), name="polyhead", route_prefix="/")
        head = cluster.head_node.node_id
        say({"ready": True, "head": head, "workers": [w.node_id for w in workers], "address": cluster.address})
        for line in sys.stdin:
            command = line.split()
            if not command:
                continue
            if command[0] == "nodes":
                say({"head": head, "workers": [w.node_id for w in workers]})
            elif command[0] == "remove":
                node = workers[int(command[1])]
                cluster.remove_node(node, allow_graceful=False)
                say({"removed": node.node_id})
            elif command[0] == "stop":
                break
            else:
                say({"error": f"unknown command {command[0]!r}"})
    finally:  # no graceful Serve shutdown (10-20 s here): the cluster goes with all its processes
        ray.shutdown()
        cluster.shutdown()
        say({"stopped": True})


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
