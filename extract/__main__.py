from llmembed.extract.cli import main

main()
