import PCoIPBrokerProtocol
import Testing
import TestSupport

@Suite("PCoIP broker protocol messages", .offPool)
struct MessageTests {
    func request(_ inner: String, version: String = "2.1") throws(BrokerProtocolError) -> BrokerRequest {
        try BrokerRequest.parse(Array("<?xml version=\"1.0\"?><pcoip-client version=\"\(version)\">\(inner)</pcoip-client>".utf8))
    }

    @Test("each request, as a client sends it")
    func requests() throws {
        #expect(try request("<hello><client-info><product-name>PCoIP Client</product-name><hostname>laptop</hostname></client-info></hello>")
                == .hello(.init(productName: "PCoIP Client", locale: "", hostname: "laptop")))
        #expect(try request("<authenticate method=\"password\"><username>alice</username><password> p w </password><domain>CORP</domain></authenticate>")
                == .authenticate(.init(username: "alice", password: " p w ", domain: "CORP")))
        #expect(try request("<get-resource-list><resource-type>DESKTOP</resource-type></get-resource-list>") == .getResourceList(.init()))
        #expect(try request("<allocate-resource><resource-id> 7 </resource-id></allocate-resource>")
                == .allocateResource(.init(resourceID: "7")))
        #expect(try request("<bye/>") == .bye)
    }

    @Test("each request survives its own document")
    func documents() throws {
        for message: BrokerRequest in [.hello(.init(productName: "x", hostname: "h")),
                                       .authenticate(.init(username: "u", password: "p<&>", domain: "d")),
                                       .getResourceList(.init()), .allocateResource(.init(resourceID: "12", clientLocation: "home")), .bye] {
            #expect(try BrokerRequest.parse(BrokerXML.serialize(message.document)) == message)
        }
    }

    @Test("refused requests name what is wrong; a password never appears in a description")
    func refused() {
        func why(_ text: String) -> String {
            do throws(BrokerProtocolError) {
                _ = try BrokerRequest.parse(Array(text.utf8))
                return "accepted"
            } catch {
                return error.description
            }
        }
        #expect(why("<pcoip-broker version=\"2.1\"><hello/></pcoip-broker>").contains("not <pcoip-client>"))
        #expect(why("<pcoip-client><hello/></pcoip-client>").contains("no version"))
        #expect(why("<pcoip-client version=\"9.0\"><hello/></pcoip-client>").contains("not supported"))
        #expect(why("<pcoip-client version=\"2.1\"><hello/><bye/></pcoip-client>").contains("exactly one message"))
        #expect(why("<pcoip-client version=\"2.1\"><launch/></pcoip-client>").contains("<launch> is not a message"))
        #expect(why("<pcoip-client version=\"2.1\"><authenticate><password>x</password></authenticate></pcoip-client>").contains("authenticate/username"))
        #expect(why("<pcoip-client version=\"2.1\"><authenticate><username>a</username></authenticate></pcoip-client>").contains("authenticate/password"))
        #expect(why("<pcoip-client version=\"2.1\"><authenticate method=\"smartcard\"><username>a</username><password/></authenticate></pcoip-client>").contains("smartcard"))
        #expect(why("<pcoip-client version=\"2.1\"><allocate-resource/></pcoip-client>").contains("resource-id"))
        #expect(why("<pcoip-client").contains("malformed XML"))
        let auth = BrokerRequest.Authenticate(username: "alice", password: "s3cret")
        #expect(!"\(auth)".contains("s3cret"))
    }

    @Test("answers: results, resources, the target, and the redirect that keeps sni, session-id and connect-tag")
    func answers() throws {
        let target = BrokerTarget(ipAddress: "10.0.0.5", hostname: "desk", sni: "desk.example", port: 4172,
                                  sessionID: "2305843009213693954", connectTag: "SCS1fw0Zbk+Eu7q2iz0/M7mx==")
        let allocated = try BrokerAnswerView(BrokerXML.parse(BrokerXML.serialize(BrokerAnswer.allocated(target, resourceID: "7"))))
        #expect(allocated.root.name == "pcoip-broker" && allocated.root.attribute("version") == "2.1")
        #expect(allocated.message.name == "allocate-resource-resp")
        #expect(allocated.resultID == "ALLOC_SUCCESSFUL" && allocated.succeeded)
        #expect(try allocated.target() == target)

        let redirected = try BrokerAnswerView(allocated.redirected(to: "203.0.113.9", port: 4172, alternates: [("203.0.113.10", 4172)]))
        let moved = try redirected.target()
        #expect(moved.ipAddress == "203.0.113.9" && moved.port == 4172)
        #expect(moved.sni == target.sni && moved.sessionID == target.sessionID && moved.connectTag == target.connectTag)
        #expect(moved.hostname == target.hostname)
        #expect(redirected.message.child("alternate-targets")?.children.count == 1)
        #expect(redirected.message.childText("resource-id") == "7")

        let failed = try BrokerAnswerView(BrokerAnswer.allocationFailure(.allocFailedNoGateway, "none"))
        #expect(!failed.succeeded && failed.resultID == "ALLOC_FAILED_NO_SECURITY_GATEWAY" && failed.resultText == "none")
        let list = try BrokerAnswerView(BrokerAnswer.resourceList([BrokerResource(name: "desk", id: "7")]))
        #expect(list.succeeded && list.message.children("resource").first?.childText("resource-id") == "7")
        #expect(list.message.child("resource")?.child("protocols")?.child("protocol")?.attribute("is-default") == "true")
        #expect(try BrokerAnswerView(BrokerAnswer.bye()).succeeded)
        #expect(try !BrokerAnswerView(BrokerAnswer.error(.errorMalformed, "x")).succeeded)
        #expect(try BrokerAnswerView(BrokerAnswer.failure(for: .hello, (.authFailedBusy, .listFailedBusy, .allocFailedBusy, .errorBusy), "busy")).message.name == "error-resp")
        #expect(try BrokerAnswerView(BrokerAnswer.failure(for: .authenticate, (.authFailedBusy, .listFailedBusy, .allocFailedBusy, .errorBusy), "busy")).resultID == "AUTH_FAILED_SERVER_BUSY")
    }
}
