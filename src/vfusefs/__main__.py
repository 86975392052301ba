from vfusefs.cli import main

main()
