"""``python -m labhelpers.tasks``: regenerate every task split, the SQL database dump and the corpus."""

from labhelpers.tasks import write_all

if __name__ == "__main__":
    for path in write_all():
        print(path)
