from cleantune.cli import main

main()
