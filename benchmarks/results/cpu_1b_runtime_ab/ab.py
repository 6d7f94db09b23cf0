import sys, json, numpy as np
import feather_runtime
from feather_runtime import Pipeline
art = sys.argv[1]
pipe = Pipeline.load(art, backend="onnxruntime-cpu", verify=False)
m = pipe.manifest["model"]
px = np.random.default_rng(0).standard_normal((1, 3, m["image_size"], m["image_size"]), dtype=np.float32)
ids = pipe.prompt_builder.build("Describe the image in detail, please.", m["num_image_tokens"])
pipe.generate_ids(px, ids, 4)
out = []
for _ in range(3):
    r = pipe.generate_ids(px, ids, 24)
    out.append((r.timings["ttft"], r.timings["decode_tokens_per_s"], len(r.token_ids)))
print(json.dumps({"runtime": "old" if "oldpath" in feather_runtime.__file__ else "new",
                  "ttft_s": [round(o[0], 3) for o in out], "decode_tok_s": [round(o[1], 3) for o in out],
                  "tokens": out[0][2]}), flush=True)
