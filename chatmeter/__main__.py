from chatmeter.cli.main import main

main()
