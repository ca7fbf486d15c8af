"""``hff-push <run-dir> <repo_id>``: publish a saved HFF model to the Hugging Face Hub with a fresh model card.

``run-dir`` is the folder ``save_pretrained`` wrote, or a training run folder holding exactly one such folder
(e.g. ``runs/fmnist/model``). The token comes from ``--token``, ``HF_TOKEN`` or ``hf auth login``; the endpoint from
``HF_ENDPOINT``. ``--dry-run`` validates the folder and prints the card without contacting the Hub;
``--card-out`` also writes the card to a file (``model_cards/<name>.md`` keeps published cards in the repo).
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ..hub import CONFIG_NAME, CheckpointError

__all__ = ['build_parser', 'find_model_dir', 'main']


def find_model_dir(run_dir: Path) -> Path:
    """``run_dir`` itself if it holds an HFF ``config.json``, else its one sub-folder (up to two levels) that does."""
    if not run_dir.is_dir():
        raise CheckpointError(f'{run_dir}: no such folder')
    if (run_dir / CONFIG_NAME).is_file():
        return run_dir
    found = sorted({p.parent for pattern in (f'*/{CONFIG_NAME}', f'*/*/{CONFIG_NAME}') for p in run_dir.glob(pattern)
                    if _is_hff_config(p)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f'{run_dir} holds no saved HFF model ({CONFIG_NAME} with an hff section); save one with '
                              f'timm_hff.save_pretrained(model, dir)')
    raise CheckpointError(f'{run_dir} holds several saved models {[str(p) for p in found]}; pass the one to push')


def _is_hff_config(path: Path) -> bool:
    from ..hub import read_config
    try:
        read_config(path)
        return True
    except CheckpointError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='hff-push', description=__doc__.split('\n\n')[0])
    p.add_argument('run_dir', type=Path, help='folder written by save_pretrained, or a run folder holding one')
    p.add_argument('repo_id', help="Hub repository, 'org/name' (created if missing)")
    p.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the saved login)')
    p.add_argument('--private', action='store_true', help='create the repository private')
    p.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    p.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    p.add_argument('--message', default='Upload HFF model (timm_hff)', help='commit message')
    p.add_argument('--card-out', type=Path, default=None, help='also write the model card to this file')
    p.add_argument('--dry-run', action='store_true', help='validate and print the card; do not contact the Hub')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..core import atomic_write_text   # after parsing: --help and argument errors answer at once
    from ..hub import build_model_card, push_to_hub, read_config
    try:
        model_dir = find_model_dir(args.run_dir)
        if args.card_out is not None or args.dry_run:
            saved = read_config(model_dir / CONFIG_NAME)
            card = str(build_model_card(saved.raw, repo_id=args.repo_id))
            if args.card_out is not None:
                atomic_write_text(args.card_out, card + '\n')
            if args.dry_run:
                print(card)
                print(f'hff-push: dry run: {model_dir} is valid; nothing was uploaded', file=sys.stderr)
                return 0
        info = push_to_hub(str(model_dir), args.repo_id, token=args.token, private=args.private,
                           revision=args.revision, create_pr=args.create_pr, commit_message=args.message)
    except (CheckpointError, ValueError) as e:
        print(f'hff-push: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:     # huggingface_hub's HTTP errors are OSErrors; keep their first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f'hff-push: error: the Hub refused the upload: {first}', file=sys.stderr)
        return 1
    print(getattr(info, 'pr_url', None) or getattr(info, 'commit_url', None) or info)
    return 0


if __name__ == '__main__':
    sys.exit(main())
