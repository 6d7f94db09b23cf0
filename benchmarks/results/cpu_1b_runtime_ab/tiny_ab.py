import sys, json, numpy as np
import feather_runtime
from feather_runtime import Pipeline
art = sys.argv[1]
pipe = Pipeline.load(art, backend="onnxruntime-cpu")
rng = np.random.default_rng(0)
m = pipe.manifest["model"]
px = rng.standard_normal((1, 3, m["image_size"], m["image_size"]), dtype=np.float32)
ids = pipe.prompt_builder.build("Where is the red square?", m["num_image_tokens"])
for _ in range(3): pipe.generate_ids(px, ids, 32)
ttft, tps = [], []
for _ in range(15):
    r = pipe.generate_ids(px, ids, 32)
    ttft.append(r.timings["ttft"]); tps.append(r.timings["decode_tokens_per_s"])
print(json.dumps({"module": feather_runtime.__file__, "tokens": len(r.token_ids), "ttft_ms_median": 1e3*float(np.median(ttft)), "decode_tok_s_median": float(np.median(tps))}))
