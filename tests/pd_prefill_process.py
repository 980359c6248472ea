"""A prefill engine in its own process, with its own Mooncake client and segment (used by tests).

Reads JSON lines on stdin: {"prompts": [[ids...], ...], "max_tokens": n} -> prefills them with
kv_export and answers {"manifests": [hex of KVManifest bytes], "stats": {...}}; EOF ends it.
The process must outlive the decode side's reads: its segment holds the blocks it wrote.
Arguments: RPC_PORT METADATA_PORT [NODE_CLIENT_PORT TRANSFER_PORT]: with the last two it attaches
to that node client instead (store.client "node"), its KV cache allocated in shared memory.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch


def main() -> None:
    rpc_port, metadata_port = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    from pdcluster.cluster.kvstore.connector import make_connector, open_backend
    from pdcluster.cluster.kvstore.manifest import handoff_to_manifest, to_bytes
    from pdcluster.cluster.spec import StoreSpec
    from pdcluster.engine import LLM, SamplingParams

    store = StoreSpec(rpc_port=rpc_port, metadata_port=metadata_port, global_segment_mib=128,
                      local_buffer_mib=16)
    backend = None
    if len(sys.argv) > 3:
        store = store.model_copy(update={"client": "node", "node_client_port": int(sys.argv[3]),
                                         "node_client_transfer_port": int(sys.argv[4])})
        backend = open_backend(store)
        assert backend is not None, "node store client unreachable"
    llm = LLM(num_kv_blocks=256, enable_prefix_caching=False,
              kv_allocator=backend.allocate if backend is not None else None)
    connector = make_connector(store, llm.engine, backend=backend)
    assert connector is not None, "store unreachable"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        eng = llm.engine
        params = SamplingParams(temperature=0, max_tokens=req.get("max_tokens", 16), ignore_eos=True)
        for i, ids in enumerate(req["prompts"]):
            eng.add_request(f"{req.get('tag', 'p')}-{i}", prompt_token_ids=ids, params=params,
                            kv_export=True)
        outs = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                outs[out.request_id] = out
        manifests = [to_bytes(handoff_to_manifest(outs[f"{req.get('tag', 'p')}-{i}"].kv_handoff)).hex()
                     for i in range(len(req["prompts"]))]
        connector.flush()  # the blocks' commit records, for the tests of the prefix cache
        print(json.dumps({"manifests": manifests, "stats": dataclasses.asdict(eng.stats())}),
              flush=True)


if __name__ == "__main__":
    main()
