from harvester.cli import console

console()
