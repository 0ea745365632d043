"""``python -m unidetox.lm_eval_tasks`` prints the include path: ``lm_eval ... --include_path $(python -m ...)``."""

from unidetox.lm_eval_tasks import include_path

print(include_path())
