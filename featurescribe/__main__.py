from featurescribe.cli import main

if __name__ == "__main__":  # not when a tool (the API reference's builder) imports every module
    raise SystemExit(main())
