from baldro_lightning.cli import cli_main
from baldro_lightning.distributed import release_process_group

if __name__ == "__main__":
    cli_main()
    release_process_group()
