"""The main job: the whole practical on the embedded data, written to one report folder. `--help` lists options."""
from tp3_fastai.cli import run, run_script

if __name__ == "__main__":
    run_script(run)
