from polydev.cli import main

main()
