from bnfuse.cli import main

main()
