"""The vLLM rollout worker process (started by jaxsd.rollout.VllmEngine; see vllm_server.py).

    python scripts/rollout_worker.py --name=rollout-0 --model_dir=<hf folder> \
        --weights_dir=<run>/weights --address_file=<file> --parent_pid=<trainer pid>

The entry point sits under `__main__` because vLLM may spawn its engine core from this module.
"""

import sys

from jaxsd.rollout.vllm_server import main

if __name__ == "__main__":
    sys.exit(main())
