from genreclf.cli import run

run()
