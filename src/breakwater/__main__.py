from breakwater.cli import main

main()
