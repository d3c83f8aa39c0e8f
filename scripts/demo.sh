#!/usr/bin/env bash
# Set up, export the built-in tiny random LLaVA-NeXT, and generate from it. Offline: no hub access needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ortllava-export --model tiny --output models/bundles/tiny
python -c "
from PIL import Image
import numpy as np
y, x = np.mgrid[0:480, 0:640]
Image.fromarray(np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], -1).astype(np.uint8)).save('models/bundles/demo.png')
"
# A random model answers with random tokens: the demo shows the pipeline working, not a sensible answer.
ortllava generate models/bundles/tiny --image models/bundles/demo.png --prompt "What is shown in this image?" --max-new-tokens 24 --timings
