"""Print the short table of a gpu_bench.json (and the goals each figure is held to)."""

import json
import sys


def main(path: str) -> None:
    r = json.load(open(path))
    print(f"\n{r['gpu']} x{r['gpus']} | commit {r['commit']} | {r['date']}")
    print(f"floors: HBM copy {r['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {r['bf16_flops'] / 1e12:.0f} TFLOP/s")
    print(f"{'what':58s} {'measured':>10s} {'floor':>10s} {'ratio':>7s}  goal")
    for key, goal in (("decode_llama", "<= 1.25x"), ("decode_llama_fi_decode", "(FlashInfer decode kernel)"),
                      ("decode_llama_sync", "(async scheduling off)"),
                      ("decode_qwen_graphs", "<= 2.5x"), ("decode_qwen_fi_decode", "(FlashInfer decode kernel)"),
                      ("decode_qwen_sync", "(async scheduling off)"),
                      ("decode_qwen_eager", "(eager, for comparison)")):
        for row in r.get(key, []) if isinstance(r.get(key), list) else []:
            name = (f"decode {row['model']} b={row['batch']} ctx={row['context']}{' graphs' if row['cuda_graphs'] else ' eager'}"
                    f"{' async' if row.get('async_scheduling') else ''} {row.get('decode_attention', '')}")
            print(f"{name:58s} {row['step_ms']:9.2f}ms {row['floor_ms']:9.2f}ms {row['ratio']:6.2f}x  {goal}")
    for row in r.get("prefill_llama", []) if isinstance(r.get("prefill_llama"), list) else []:
        print(f"{'prefill ' + row['model'] + ' ' + str(row['tokens']) + ' tok':58s} {row['prefill_ms']:9.2f}ms "
              f"{row['floor_ms']:9.2f}ms {row['ratio']:6.2f}x  <= 1.3x")
    for row in r.get("kv_pull", []) if isinstance(r.get("kv_pull"), list) else []:
        name = f"cuda_ipc pull {row['tokens']} tok {row['src']}->{row['dst']} ({row['bytes'] / 1e6:.0f} MB)"
        print(f"{name:58s} {row['pull_ms']:9.3f}ms {row['contiguous_copy_ms']:9.3f}ms {row['fraction_of_copy_bw']:6.2f}   "
              f">= 0.50 of copy bw; handle open {row['open_ms']:.1f} ms once")
    for k, v in r.items():
        if isinstance(v, dict) and "error" in v:
            print(f"{k}: ERROR {v['error']}")


if __name__ == "__main__":
    main(sys.argv[1])
