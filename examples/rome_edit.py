"""One ROME edit on your own model and tokenizer: compute, apply, check, save, revert.

python examples/rome_edit.py            # the embedded default model
python examples/rome_edit.py --model Qwen/Qwen2.5-0.5B-Instruct
"""

import argparse

from factedit import EditRequest, compute_rome, load_model
from factedit.predict import top_next_tokens

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="registry name, folder, .gguf file or hub id")
args = parser.parse_args()

model, tok = load_model(args.model)  # or AutoModelForCausalLM / AutoTokenizer .from_pretrained(...)
request = EditRequest(prompt="The {} is located in the city of", subject="Eiffel Tower", target="Rome")

result = compute_rome(model, tok, request, progress=True)  # the model is not changed yet
print("converged:", result.converged[0], " seconds:", result.timings)
handle = result.patch.apply(model)
print("after: ", top_next_tokens(model, tok, ["The Eiffel Tower is located in the city of"], k=3)[0])
result.patch.save("runs/example_rome")  # runs/example_rome/patch.safetensors
handle.revert()  # bit-exact
print("reverted:", top_next_tokens(model, tok, ["The Eiffel Tower is located in the city of"], k=3)[0])
