"""KV handoff bandwidth through a real Mooncake store vs memcpy and raw TCP of the same bytes, same run."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing as mp
import socket
import statistics
import time
import uuid
import zlib
from dataclasses import dataclass, replace

import torch

from ..kvstore.backend import StoreConfig
from ..kvstore.connector import MooncakeConnector, commit_key
from ..kvstore.master import MooncakeMaster
from ..kvstore.mooncake_client import MooncakeBackend
from ..kvstore.node_client import MooncakeNodeClient, NodeClientConfig
from ..kvstore.same_host import copy_spans

# This process ("prefill") puts blocks the way a prefill worker does (MooncakeConnector.save: the blocks;
# their commit records follow in the background, as in the product); a second one ("decode") gets them. Store client modes:
# embedded = each process runs its own Mooncake client and segment, in shared memory: the writer copies
# its blocks straight into its own segment and the reader copies same-host replicas straight out of it
# (the default); embedded-tcp = the same with `same_host_reads` off (the bytes cross Mooncake's transfer
# both ways, TCP for the get, as between hosts); node = both
# attach over shared memory to one node client (`mooncake_client`) that owns the segment and does the
# copies (two workers on one node); node-2 = each attaches to its own node client (two nodes on one
# host: the hop between the node clients is loopback TCP).
#
# The baseline is a plain memcpy of the same bytes in one process: one memcpy call, one thread. An
# all-core copy (torch's parallel copy_) is shown beside it.

MODES = ("embedded", "embedded-tcp", "node", "node-2")


@dataclass(frozen=True)
class Case:
    name: str
    block_nbytes: int
    num_blocks: int

    @property
    def nbytes(self) -> int:
        return self.block_nbytes * self.num_blocks


# One block = all layers' KV for 16 tokens (block_size 16), per TP rank.
SMOLLM2_FP32 = 30 * 16 * 2 * 3 * 64 * 4  # 30 layers, K+V, 3 kv heads, head_dim 64, fp32: 737,280 B
LLAMA8B_BF16 = 32 * 16 * 2 * 8 * 128 * 2  # 32 layers, 8 kv heads, head_dim 128, bf16: 2 MiB
DEEPSEEK_MLA_BF16 = 61 * 16 * (512 + 64) * 2  # 61 layers, latent 512 + rope 64, bf16: 1,124,352 B
CASES = {
    "smollm2-1k": Case("smollm2 fp32, 1K-token prompt", SMOLLM2_FP32, 64),
    "smollm2-4k": Case("smollm2 fp32, 4K-token prompt", SMOLLM2_FP32, 256),
    "llama8b-1k": Case("llama-8B bf16, 1K-token prompt", LLAMA8B_BF16, 64),
    "dsr1-mla-1k": Case("deepseek-r1 MLA bf16, 1K tokens", DEEPSEEK_MLA_BF16, 64),
}


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(memoryview(t.numpy()))


def _recv_all(port: int, into: memoryview) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while got < len(into):
            n = s.recv_into(into[got:])
            if n == 0:
                raise ConnectionError("sender closed early")
            got += n


def _reader(config: StoreConfig, num_blocks: int, block_nbytes: int, conn) -> None:
    """The decode side: answers ("get", keys) by a store get, and ("tcp", port) by reading the same
    bytes from a plain socket (the loopback ceiling for any TCP transport), each with
    (seconds, crc32 of what arrived, blocks copied from a same-host segment)."""
    backend = MooncakeBackend(config)
    cache = backend.allocate(num_blocks * block_nbytes).view(num_blocks, block_nbytes)
    backend.register_cache(cache)
    ids = list(range(num_blocks))
    conn.send("ready")
    while (msg := conn.recv()) != "stop":
        kind, arg = msg
        direct = backend.blocks_read_same_host
        t = time.perf_counter()
        if kind == "get":
            backend.get_cache_blocks(cache, ids, arg)
        else:
            _recv_all(arg, memoryview(cache.view(-1).numpy()))
        dt = time.perf_counter() - t
        crc = _crc(cache)
        cache.zero_()  # the next round must really arrive, not be left over; before the answer, so
        # that nothing runs beside the memcpy the writer times next
        conn.send((dt, crc, backend.blocks_read_same_host - direct))
    backend.close()
    conn.send("closed")


def _memcpy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    """One plain memcpy of all the bytes (one call, one thread)."""
    t = time.perf_counter()
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    return time.perf_counter() - t


def _all_core_copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    """torch's copy_, which splits a large copy over all its threads."""
    t = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t


def _kv_copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    """The copy the store's direct puts and same-host reads make (kv_shm.copy_spans: block by block,
    streaming stores on up to four threads from 8 MiB), of the same bytes in this process."""
    spans = [(d.data_ptr(), s.data_ptr(), s.numel()) for d, s in zip(dst, src)]
    t = time.perf_counter()
    copy_spans(spans)
    return time.perf_counter() - t


def _recv(conn, timeout_s: float = 120.0):
    """The reader's next answer; a reader that died or hangs fails the run instead of stalling it."""
    if not conn.poll(timeout_s):
        raise TimeoutError(f"the reader process sent nothing for {timeout_s:.0f} s")
    return conn.recv()


def _raw_tcp_seconds(src: torch.Tensor, conn, want: int) -> float:
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn.send(("tcp", server.getsockname()[1]))
        peer, _ = server.accept()
        with peer:
            peer.sendall(memoryview(src.view(-1).numpy()))
    seconds, crc, _ = _recv(conn)
    if crc != want:
        raise RuntimeError("raw TCP baseline delivered different bytes")
    return seconds


def segment_bytes(case: Case) -> int:
    """Room for one round's objects plus slack; objects are removed after each round."""
    return max(64 << 20, int(case.nbytes * 1.5))


def run_case(case: Case, master: MooncakeMaster, iters: int, local_buffer_mib: int,
             prefer_local_segment: bool = True, mode: str = "embedded",
             nodes: tuple[MooncakeNodeClient, ...] = ()) -> dict:
    """`nodes`: the node clients the writer and the reader attach to (node: one, node-2: two)."""
    config = StoreConfig(master_server_addr=master.rpc_address, metadata_server=master.metadata_url,
                         global_segment_size=segment_bytes(case), local_buffer_size=local_buffer_mib << 20,
                         prefer_local_segment=prefer_local_segment)
    if mode.startswith("embedded"):
        writer_config = reader_config = replace(config, same_host_reads=mode == "embedded")
    else:
        writer_node, reader_node = nodes[0], nodes[-1]
        writer_config, reader_config = (
            replace(config, client="node", node_client_address=n.rpc_address, node_segment=n.segment_name)
            for n in (writer_node, reader_node))
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_reader, args=(reader_config, case.num_blocks, case.block_nbytes, child),
                       daemon=True)
    proc.start()
    writer = MooncakeBackend(writer_config)
    try:
        src = writer.allocate(case.nbytes).view(case.num_blocks, case.block_nbytes)
        src.copy_(torch.randint(0, 256, (case.num_blocks, case.block_nbytes), dtype=torch.uint8))
        connector = MooncakeConnector(writer, src)  # registers src
        want = _crc(src)
        ids = list(range(case.num_blocks))
        sums = [_crc(block) for block in src]  # the engine's checksums, computed before the put
        dst = torch.empty_like(src)
        dst.copy_(src)  # touch dst once so memcpy is not timed on first-touch page faults
        if _recv(conn) != "ready":
            raise RuntimeError("the reader process did not start")
        rounds = []
        for _ in range(iters + 1):  # round 0 is cold: the segments' pages are touched for the first time
            keys = [f"bench/{uuid.uuid4().hex}/{i}" for i in ids]
            t = time.perf_counter()
            if not all(connector.save(keys, ids, sums)):
                raise RuntimeError(f"{case.name}: the put failed")
            put_s = time.perf_counter() - t
            conn.send(("get", keys))
            get_s, crc, direct = _recv(conn)
            if crc != want:
                raise RuntimeError(f"{case.name}: the reader got different bytes")
            connector.flush()  # the commit records, written in the background: gone before the next round
            writer.remove(keys + [commit_key(k) for k in keys], force=True)
            tcp_s = _raw_tcp_seconds(src, conn, want)
            # memcpy in every round, so a busy neighbour slows both sides of the ratio alike
            rounds.append((put_s, get_s, _memcpy_seconds(src, dst), tcp_s, _all_core_copy_seconds(src, dst),
                           direct / case.num_blocks, _kv_copy_seconds(src, dst)))
        conn.send("stop")
        _recv(conn)  # "closed"
    finally:
        writer.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    warm = rounds[1:]
    gb = case.nbytes / 1e9
    return {"case": case, "mode": mode,
            "put": gb / statistics.median(r[0] for r in warm),
            "get": gb / statistics.median(r[1] for r in warm),
            "handoff": gb / statistics.median(r[0] + r[1] for r in warm),
            "memcpy": gb / statistics.median(r[2] for r in warm),
            "tcp": gb / statistics.median(r[3] for r in warm),
            "tcp/mc": statistics.median(r[2] / r[3] for r in warm),
            "allcore": gb / statistics.median(r[4] for r in warm),
            "kvcopy": gb / statistics.median(r[6] for r in warm),
            "hand/all": statistics.median(r[4] / (r[0] + r[1]) for r in warm),
            "direct": statistics.median(r[5] for r in warm),
            "get/mc": statistics.median(r[2] / r[1] for r in warm),
            "hand/mc": statistics.median(r[2] / (r[0] + r[1]) for r in warm),
            "cold_handoff": gb / (rounds[0][0] + rounds[0][1])}


def format_table(rows: list[dict]) -> str:
    head = (f"{'case':33} {'mode':12} {'blocks':>6} {'block KB':>8} {'MB':>6} {'put':>6} {'get':>6} "
            f"{'handoff':>7} {'memcpy':>6} {'all-core':>8} {'kv copy':>7} {'raw tcp':>7} {'get/mc':>6} {'hand/mc':>7} "
            f"{'hand/all':>8} {'tcp/mc':>6} {'direct':>6} {'cold hand':>9} {'vs tcp':>6}")
    lines = [head, "-" * len(head)]
    over_tcp = {r["case"]: r["handoff"] for r in rows if r["mode"] == "embedded-tcp"}
    for r in rows:
        c: Case = r["case"]
        vs = f"{r['handoff'] / over_tcp[c]:>5.1f}x" if c in over_tcp else f"{'-':>6}"
        lines.append(f"{c.name:33} {r['mode']:12} {c.num_blocks:>6} {c.block_nbytes / 1e3:>8.1f} "
                     f"{c.nbytes / 1e6:>6.1f} {r['put']:>6.2f} {r['get']:>6.2f} {r['handoff']:>7.2f} "
                     f"{r['memcpy']:>6.2f} {r['allcore']:>8.2f} {r['kvcopy']:>7.2f} {r['tcp']:>7.2f} {r['get/mc']:>6.0%} "
                     f"{r['hand/mc']:>7.0%} {r['hand/all']:>8.0%} {r['tcp/mc']:>6.0%} {r['direct']:>6.0%} "
                     f"{r['cold_handoff']:>9.2f} {vs}")
    lines += ["Bandwidths in GB/s. handoff = put (prefill side: MooncakeConnector.save, whose commit records",
              "follow in the background) then get (decode side): bytes / (put + get).",
              "memcpy = one plain memcpy of the same bytes in this process (one thread); all-core = torch's",
              "parallel copy_ of them; kv copy = the copy direct puts and same-host reads make (block by",
              "block, streaming stores on up to four threads); raw tcp = the same bytes over one plain loopback socket between the",
              "two processes. All timed in every round with the other process idle; medians of warm rounds,",
              "ratios taken per round; cold = first round (fresh segment pages). direct = share of blocks",
              "the reader copied straight out of a same-host segment.",
              "mode: embedded = a Mooncake client in each process, puts copied into the writer's own segment",
              "and gets out of it directly (the default); embedded-tcp = same_host_reads off (Mooncake's",
              "transfer both ways, TCP for the get); node = both processes",
              "attached over shared memory to one node client (mooncake_client); node-2 = one node client",
              "each (the hop between them is loopback TCP). vs tcp = handoff relative to embedded-tcp."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdcluster.cluster.tools.bench_kv",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="smollm2-1k,llama8b-1k,dsr1-mla-1k",
                        help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--iters", type=int, default=5, help="warm rounds per case (plus one cold)")
    parser.add_argument("--local-buffer-mib", type=int, default=16)
    parser.add_argument("--random-placement", action="store_true",
                        help="let the master place objects in any segment (default: the writer's own)")
    parser.add_argument("--modes", default="embedded,embedded-tcp,node",
                        help=f"comma-separated store client modes, from: {', '.join(MODES)}")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    modes = args.modes.split(",")
    unknown = [c for c in cases if c not in CASES] + [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown case(s)/mode(s) {unknown}; choose from {list(CASES)} and {list(MODES)}")
    with contextlib.ExitStack() as stack:
        master = stack.enter_context(MooncakeMaster())
        segment = max(segment_bytes(CASES[c]) for c in cases)
        n_nodes = 2 if "node-2" in modes else 1 if "node" in modes else 0
        nodes = tuple(stack.enter_context(MooncakeNodeClient(NodeClientConfig(
            master.rpc_address, master.metadata_url, global_segment_size=segment))) for _ in range(n_nodes))
        rows = [run_case(CASES[c], master, args.iters, args.local_buffer_mib, not args.random_placement,
                         mode, nodes[:1] if mode == "node" else nodes)
                for c in cases for mode in modes]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
